#!/usr/bin/env python3
"""Generate extra parity fixtures for slimcandle, in the format of the shared ones.

The shared fixtures (see shared/fixtures/README.md) cover one configuration per
architecture. This script adds width/group variants so that the Rust side can be
tested on channel counts that are not the defaults (odd divisibility, rounding of
width multipliers, group counts other than 3, ...).

Per model NAME it writes:
  NAME.safetensors     state_dict of the 10-class model (num_batches_tracked included)
  NAME.io.safetensors  input_96 (2x3x96x96), logits_96, input_113 (1x3x113x113), logits_113
and DIR/reference.json with params / MACs per NAME.

Usage:
  make_reference_fixtures.py --verify-shared /work/shared/fixtures
  make_reference_fixtures.py --out /tmp/extra_fixtures
"""

import argparse
import json
import os
import sys
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)

NUM_CLASSES = 10
TOL = 1e-4


# --------------------------------------------------------------------------------------
# MobileNet V1 (not in torchvision): layout from shared/fixtures/README.md
# --------------------------------------------------------------------------------------

# (out_channels, stride) of the 13 depthwise-separable blocks at width 1.0.
MOBILENET_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [
    (512, 1)
] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000):
        super().__init__()
        # README: channels scaled by `a` with int truncation (no rounding to multiples of 8).
        c = int(32 * width_mult)
        layers = [
            nn.Sequential(
                nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU6(inplace=True),
            )
        ]
        for out, stride in MOBILENET_V1_BLOCKS:
            o = int(out * width_mult)
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU6(inplace=True),
                    nn.Conv2d(c, o, 1, bias=False),
                    nn.BatchNorm2d(o),
                    nn.ReLU6(inplace=True),
                )
            )
            c = o
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


# --------------------------------------------------------------------------------------
# ShuffleNet V1 (not in torchvision): layout from shared/fixtures/README.md
# --------------------------------------------------------------------------------------

# Stage-2 output channels at scale 1.0, per group count; stages 3 and 4 double each time.
SHUFFLENET_V1_STAGE2 = {1: 144, 2: 200, 3: 240, 4: 272, 8: 384}
SHUFFLENET_V1_UNITS = [4, 8, 4]


def shufflenet_v1_stem(groups: int, scale: float) -> int:
    if scale in (1.0, 1.5):
        return 24
    if scale == 2.0:
        return 48
    if scale == 0.5:
        # README only documents g=3 (12) and g=8 (16); other groups use 12 as well.
        return 16 if groups == 8 else 12
    raise ValueError(f"unsupported ShuffleNet V1 scale {scale}")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    # torchvision convention (same as torchvision.models.shufflenetv2.channel_shuffle).
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    def __init__(self, inp: int, out: int, groups: int, stride: int, first_group: int):
        super().__init__()
        self.stride = stride
        self.groups = groups
        mid = out // 4
        # Stride-2 units concatenate the pooled input, so the main branch only adds out - in.
        o = out if stride == 1 else out - inp
        for name, ch, g in (("in", inp, first_group), ("mid", mid, groups), ("out", o, groups)):
            if ch % g:
                raise ValueError(f"ShuffleNet V1: {name} channels {ch} not divisible by groups {g}")
        self.branch_main_1 = nn.Sequential(
            nn.Conv2d(inp, mid, 1, groups=first_group, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
        )
        self.branch_main_2 = nn.Sequential(
            nn.Conv2d(mid, o, 1, groups=groups, bias=False),
            nn.BatchNorm2d(o),
        )

    def forward(self, x):
        y = self.branch_main_1(x)
        if self.groups > 1:
            y = channel_shuffle(y, self.groups)
        y = self.branch_main_2(y)
        if self.stride == 1:
            return F.relu(y + x)
        return torch.cat([F.avg_pool2d(x, 3, stride=2, padding=1), F.relu(y)], dim=1)


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 3, scale: float = 1.0, num_classes: int = 1000):
        super().__init__()
        stem = shufflenet_v1_stem(groups, scale)
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        units = []
        inp = stem
        for stage, n in enumerate(SHUFFLENET_V1_UNITS):
            out = int(SHUFFLENET_V1_STAGE2[groups] * (2**stage) * scale)
            for i in range(n):
                # The very first unit sees only the few stem channels, hence a dense 1x1.
                first_group = 1 if (stage == 0 and i == 0) else groups
                units.append(ShuffleV1Unit(inp, out, groups, 2 if i == 0 else 1, first_group))
                inp = out
        self.features = nn.Sequential(*units)
        self.classifier = nn.Sequential(nn.Linear(inp, num_classes, bias=False))

    def forward(self, x):
        x = self.maxpool(self.first_conv(x))
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------

tvm = torchvision.models

# Models already in shared/fixtures: used to check this script's modules and MAC counter.
SHARED = {
    "squeezenet1_0": lambda nc: tvm.squeezenet1_0(num_classes=nc),
    "squeezenet1_1": lambda nc: tvm.squeezenet1_1(num_classes=nc),
    "mobilenet_v2": lambda nc: tvm.mobilenet_v2(num_classes=nc),
    "mobilenet_v3_small": lambda nc: tvm.mobilenet_v3_small(num_classes=nc),
    "mobilenet_v3_large": lambda nc: tvm.mobilenet_v3_large(num_classes=nc),
    "shufflenet_v2_x0_5": lambda nc: tvm.shufflenet_v2_x0_5(num_classes=nc),
    "shufflenet_v2_x1_0": lambda nc: tvm.shufflenet_v2_x1_0(num_classes=nc),
    "mobilenet_v1": lambda nc: MobileNetV1(1.0, nc),
    "shufflenet_v1_g3": lambda nc: ShuffleNetV1(3, 1.0, nc),
}

# New configurations. mobilenet_v3_* forward width_mult to _mobilenet_v3_conf via **kwargs
# (MobileNetV3.__init__ swallows the extra kwarg).
EXTRA = {
    "mobilenet_v2_w0_5": lambda nc: tvm.mobilenet_v2(num_classes=nc, width_mult=0.5),
    "mobilenet_v2_w0_35": lambda nc: tvm.mobilenet_v2(num_classes=nc, width_mult=0.35),
    "mobilenet_v2_w1_4": lambda nc: tvm.mobilenet_v2(num_classes=nc, width_mult=1.4),
    "mobilenet_v3_small_w0_75": lambda nc: tvm.mobilenet_v3_small(num_classes=nc, width_mult=0.75),
    "mobilenet_v3_large_w0_5": lambda nc: tvm.mobilenet_v3_large(num_classes=nc, width_mult=0.5),
    "shufflenet_v2_x1_5": lambda nc: tvm.shufflenet_v2_x1_5(num_classes=nc),
    "shufflenet_v2_x2_0": lambda nc: tvm.shufflenet_v2_x2_0(num_classes=nc),
    "mobilenet_v1_w0_5": lambda nc: MobileNetV1(0.5, nc),
    "mobilenet_v1_w0_25": lambda nc: MobileNetV1(0.25, nc),
    "shufflenet_v1_g1": lambda nc: ShuffleNetV1(1, 1.0, nc),
    "shufflenet_v1_g2": lambda nc: ShuffleNetV1(2, 1.0, nc),
    "shufflenet_v1_g4": lambda nc: ShuffleNetV1(4, 1.0, nc),
    "shufflenet_v1_g8": lambda nc: ShuffleNetV1(8, 1.0, nc),
    "shufflenet_v1_g8_w0_5": lambda nc: ShuffleNetV1(8, 0.5, nc),
    "shufflenet_v1_g3_w1_5": lambda nc: ShuffleNetV1(3, 1.5, nc),
    "shufflenet_v1_g3_w2_0": lambda nc: ShuffleNetV1(3, 2.0, nc),
    "shufflenet_v1_g3_w0_5": lambda nc: ShuffleNetV1(3, 0.5, nc),
}


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = 224) -> int:
    """Multiply-adds of Conv2d and Linear only, bias excluded, for one image.

    Hooks rather than an analytic formula so that the count follows whatever the module
    actually computes (SE blocks on 1x1 maps, odd spatial sizes, ...).
    """
    total = 0

    def conv_hook(m, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m, _inp, out):
        nonlocal total
        total += (out.numel() // m.out_features) * m.in_features * m.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


def reference_entry(build, model10: nn.Module, logits_96: torch.Tensor) -> dict:
    model1000 = build(1000)
    return {
        # Same meaning as the shared reference.json: how much the two 96px inputs' logits
        # differ, i.e. evidence that the fixture does not collapse to a constant output.
        "logit_spread_96": round((logits_96[0] - logits_96[1]).abs().max().item(), 4),
        "macs_224_1000_classes": count_macs(model1000),
        "params_1000_classes": count_params(model1000),
        "params_10_classes": count_params(model10),
    }


# --------------------------------------------------------------------------------------
# Fixture generation
# --------------------------------------------------------------------------------------


def seed_for(name: str) -> int:
    # crc32 rather than hash(): Python's str hash is salted per process.
    return zlib.crc32(name.encode())


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    Fresh BatchNorms are the identity in eval mode (w=1, b=0, mean=0, var=1), so a loader
    that ignored or mis-mapped them would still pass. Drawing the running statistics
    independently of the activations (e.g. mean ~ N(0, 0.2), var ~ U(0.5, 1.5)) does not
    work either: nothing re-normalizes the activations, which drift layer after layer until
    the ReLUs clip everything and the logits no longer depend on the input (spread 0).
    So the affine parameters are random, and the running statistics are measured on random
    inputs, as the shared fixtures do: they differ from 0/1 per channel (so they matter)
    while keeping every layer's output at a sane scale.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 96, 96))
        model.eval()
        for m in bns:
            m.momentum = 0.1
            # The shared fixtures carry num_batches_tracked = 0; keep the files alike.
            m.num_batches_tracked.zero_()


def widen_classifier(model: nn.Module) -> None:
    # torchvision initializes classifier Linears with N(0, 0.01) and zero bias, which leaves
    # logits nearly input-independent (spread ~0.03 for mobilenet_v3_small_w0_75); a parity
    # test at 1e-4 then proves little. std 1/sqrt(in) keeps the logit scale near the
    # feature scale, and a random bias makes a dropped bias visible.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2)


def make_fixture(name: str, build, out_dir: str) -> dict:
    torch.manual_seed(seed_for(name))
    model = build(NUM_CLASSES)
    widen_classifier(model)
    randomize_batchnorm(model)
    model.eval()
    x96 = torch.randn(2, 3, 96, 96)
    x113 = torch.randn(1, 3, 113, 113)
    with torch.no_grad():
        y96 = model(x96)
        y113 = model(x113)
    assert y96.shape == (2, NUM_CLASSES) and y113.shape == (1, NUM_CLASSES)
    assert torch.isfinite(y96).all() and torch.isfinite(y113).all(), name

    # save_file requires contiguous, non-aliased tensors; state_dict tensors already are.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, f"{name}.safetensors"))
    save_file(
        {
            "input_96": x96.contiguous(),
            "logits_96": y96.contiguous(),
            "input_113": x113.contiguous(),
            "logits_113": y113.contiguous(),
        },
        os.path.join(out_dir, f"{name}.io.safetensors"),
    )
    return reference_entry(build, model, y96)


# --------------------------------------------------------------------------------------
# Checks against the shared fixtures
# --------------------------------------------------------------------------------------


def check_counts_against_shared(shared_dir: str) -> None:
    """Assert params/MACs of every shared model equal the shared reference.json.

    This is what makes the numbers written for the extra models trustworthy: same counter,
    same convention.
    """
    with open(os.path.join(shared_dir, "reference.json")) as f:
        ref = json.load(f)
    for name, build in SHARED.items():
        m10, m1000 = build(NUM_CLASSES), build(1000)
        got = {
            "params_10_classes": count_params(m10),
            "params_1000_classes": count_params(m1000),
            "macs_224_1000_classes": count_macs(m1000),
        }
        for key, val in got.items():
            assert val == ref[name][key], f"{name}.{key}: got {val}, shared says {ref[name][key]}"
        print(f"counts ok  {name:20s} params_1000={got['params_1000_classes']} "
              f"macs={got['macs_224_1000_classes']}")


def verify_shared(shared_dir: str, names=None) -> None:
    """Strict-load each shared checkpoint into our module and compare the logits."""
    worst = 0.0
    for name in names or SHARED:
        model = SHARED[name](NUM_CLASSES)
        # strict=True: every key and shape of the README layout must line up.
        model.load_state_dict(load_file(os.path.join(shared_dir, f"{name}.safetensors")), strict=True)
        model.eval()
        io = load_file(os.path.join(shared_dir, f"{name}.io.safetensors"))
        with torch.no_grad():
            d96 = (model(io["input_96"]) - io["logits_96"]).abs().max().item()
            d113 = (model(io["input_113"]) - io["logits_113"]).abs().max().item()
        d = max(d96, d113)
        worst = max(worst, d)
        status = "ok" if d <= TOL else "FAIL"
        print(f"logits {status:4s} {name:20s} max|diff| 96={d96:.3e} 113={d113:.3e}")
        assert d <= TOL, f"{name}: max abs diff {d} > {TOL}"
    print(f"verify-shared passed, worst max|diff| = {worst:.3e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify-shared", metavar="DIR",
                    help="check MobileNet V1 / ShuffleNet V1 (and the torchvision models) "
                         "against the shared fixtures, and the MAC counter against reference.json")
    ap.add_argument("--out", metavar="DIR", help="write the extra fixtures and reference.json here")
    ap.add_argument("--shared", metavar="DIR", default="/work/shared/fixtures",
                    help="shared fixtures used to self-check the MAC counter in --out mode")
    args = ap.parse_args()
    if not args.verify_shared and not args.out:
        ap.error("give --verify-shared DIR and/or --out DIR")

    if args.verify_shared:
        verify_shared(args.verify_shared)
        check_counts_against_shared(args.verify_shared)

    if args.out:
        # Refuse to write numbers from a counter that disagrees with the shared reference.
        if os.path.isfile(os.path.join(args.shared, "reference.json")):
            check_counts_against_shared(args.shared)
        else:
            print(f"warning: {args.shared}/reference.json not found, MAC counter not self-checked",
                  file=sys.stderr)
        os.makedirs(args.out, exist_ok=True)
        reference = {}
        for name, build in EXTRA.items():
            try:
                reference[name] = make_fixture(name, build, args.out)
            except ValueError as e:
                # Channel counts not divisible by the groups: the config does not exist.
                print(f"skipped    {name}: {e}")
                continue
            r = reference[name]
            print(f"wrote      {name:26s} params_10={r['params_10_classes']:>9d} "
                  f"params_1000={r['params_1000_classes']:>9d} macs={r['macs_224_1000_classes']:>11d} "
                  f"spread96={r['logit_spread_96']}")
        with open(os.path.join(args.out, "reference.json"), "w") as f:
            json.dump(reference, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
