#!/usr/bin/env python3
"""PyTorch's training loop on an image folder, for the real-loop comparison of docs/performance.md
(issue #15: "report epoch wall time beside PyTorch's loop on the same data").

The same model as `pytorch_reference.py` builds (torchvision's, with `--stem cifar` as
docs/models.md), torchvision's ImageFolder + DataLoader with the augmentation slimcandle's
`--crop-padding 4` applies (RandomCrop(padding) + RandomHorizontalFlip), SGD with Nesterov
momentum and a one-cycle schedule, then one pass over the test split in eval mode. Prints
one JSON line: images/s of the training loop (data loading included, the first `--warmup`
batches excluded), the epoch's wall time, the evaluation's time and top-1.

    python3 bench/torch_train_loop.py --data ../shared/data/cifar10 --arch shufflenet_v2 \\
        --width 1.0 --stem cifar --batch 128 --threads 2 --workers 2 [--train-limit N]

The slimcandle counterpart is `slimcandle train --data folder:DIR --crop-padding 4 ...
--epochs 1`, whose epoch line prints the same figures.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="image folder with train/ and test/")
    ap.add_argument("--arch", required=True)
    ap.add_argument("--width", type=float)
    ap.add_argument("--groups", type=int)
    ap.add_argument("--stem", choices=["imagenet", "cifar"], default="cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--warmup", type=int, default=5, help="batches left out of images/s")
    ap.add_argument("--train-limit", type=int, help="train on the first N batches only")
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms
    from pytorch_reference import build_model, parse_arch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    family, width, groups = parse_arch(args.arch, args.width, args.groups)
    if family == "shufflenet_v1" and groups is None:
        groups = 3
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_set = datasets.ImageFolder(os.path.join(args.data, "train"), transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    test_set = datasets.ImageFolder(os.path.join(args.data, "test"),
                                    transforms.Compose([transforms.ToTensor(), normalize]))
    model = build_model(family, width, groups, len(train_set.classes), args.stem)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, shuffle=True,
                                         num_workers=args.workers, drop_last=False,
                                         persistent_workers=False)
    steps = len(loader) if args.train_limit is None else min(args.train_limit, len(loader))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps,
                                                pct_start=0.15)
    model.train()
    epoch_start = time.perf_counter()
    timed_start, timed_images = None, 0
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        if i == args.warmup:
            timed_start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if timed_start is not None:
            timed_images += x.shape[0]
    train_end = time.perf_counter()
    model.eval()
    correct = total = 0
    eval_loader = torch.utils.data.DataLoader(test_set, batch_size=256, num_workers=args.workers)
    with torch.inference_mode():
        for x, y in eval_loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.shape[0]
    eval_end = time.perf_counter()
    print(json.dumps({
        "framework": "pytorch", "arch": args.arch, "batch": args.batch, "threads": args.threads,
        "workers": args.workers, "train_batches": steps,
        "train_images_per_s": timed_images / (train_end - timed_start) if timed_start else None,
        "train_seconds": train_end - epoch_start, "eval_seconds": eval_end - train_end,
        "test_top1": 100.0 * correct / total,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
