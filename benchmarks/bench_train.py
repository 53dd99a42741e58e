"""Training-step cost of the DeepLabv3 models: counted FLOPs, measured time, minutes per 10k iterations.

For each architecture: the FLOPs of one training step (forward, main + 0.4 auxiliary
cross-entropy, backward) counted with ``torch.utils.flop_counter`` on the meta device, then the
median wall time of ``--steps`` optimiser steps (SGD, float16 autocast on CUDA) on random
images and labels after ``--warmup`` steps, the device synchronised around each step. Data
loading is not included. Ratios are to the first architecture in the same run.

    python benchmarks/bench_train.py --device cuda --crop 512 --batch 8     # the SyntaGen step on a GPU
    python benchmarks/bench_train.py --crop 128 --batch 2 --steps 3         # a small CPU run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pccfast.training.models import ARCHS, build_model


def _step(model, opt, scaler, x, y, amp: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
        out = model(x)
    loss = F.cross_entropy(out["out"].float(), y) + 0.4 * F.cross_entropy(out["aux"].float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def step_flops(arch: str, crop: int, batch: int) -> float:
    """FLOPs of one training step at ``batch`` x ``crop`` x ``crop``, counted on the meta device."""
    model, _ = build_model(arch, 21, "none", implementation="builtin")
    model = model.to("meta")
    x = torch.randn(batch, 3, crop, crop, device="meta")
    y = torch.randint(0, 21, (batch, crop, crop), device="meta")
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        (F.cross_entropy(out["out"], y) + 0.4 * F.cross_entropy(out["aux"], y)).backward()
    return float(fc.get_total_flops())


def measure(arch: str, crop: int, batch: int, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per training step."""
    torch.manual_seed(0)
    model, _ = build_model(arch, 21, "none")
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, 21, (batch, crop, crop), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        _step(model, opt, scaler, x, y, amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--crop", type=int, default=512, help="square crop side (default: 512, the recipes')")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: 8, the SyntaGen batch)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per architecture")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f"device {device}, crop {args.crop}, batch {args.batch}, median of {args.steps} steps")
    print(f"{'arch':<30} {'TFLOP/step':>10} {'s/step':>8} {'img/s':>7} {'TFLOP/s':>8} {'min/10k':>8} {'x first':>8}")
    for arch in args.archs.split(","):
        flops = step_flops(arch, args.crop, args.batch)
        sec = measure(arch, args.crop, args.batch, device, args.steps, args.warmup)
        rows.append({"arch": arch, "tflop_per_step": flops / 1e12, "s_per_step": sec, "img_s": args.batch / sec,
                     "tflop_s": flops / sec / 1e12, "min_per_10k": sec * 10_000 / 60})
        r = rows[-1]
        print(f"{arch:<30} {r['tflop_per_step']:>10.3f} {sec:>8.3f} {r['img_s']:>7.1f} {r['tflop_s']:>8.2f} "
              f"{r['min_per_10k']:>8.1f} {sec / rows[0]['s_per_step']:>8.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": str(device), "crop": args.crop, "batch": args.batch, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
