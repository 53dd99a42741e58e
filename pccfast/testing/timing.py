"""Timing for the benchmarks: synchronise the device around the timed region, repeat, take the median."""
from __future__ import annotations

import os
import statistics
import subprocess
import time

import torch

__all__ = ["sync", "timed", "median_time", "git_version"]


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    """``(fn(), seconds)`` with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def median_time(fn, repeats: int, device="cpu"):
    """One untimed warm-up call, then the median of ``repeats`` timed calls: ``(last output, seconds)``."""
    out = fn()
    times = []
    for _ in range(repeats):
        out, t = timed(fn, device)
        times.append(t)
    return out, statistics.median(times)


def git_version(root: str | None = None) -> str:
    """Short commit of the checkout ('+changes' if pccfast/ or benchmarks/ differ from it), or 'unknown'."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pccfast", "benchmarks"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")
