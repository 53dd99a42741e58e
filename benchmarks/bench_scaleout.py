"""Benchmark: generate throughput with 1 and 2 Ray workers (and without Ray), and where the time goes.

In one run, on the same prompts and model:

- ``no Ray``: the single-process loop (:func:`pccfast.runs.engine.run_local`) with every
  core in one process, pipeline loaded and warmed up before the clock starts;
- ``ray xN``: :func:`pccfast.runs.ray.run_ray` with N workers on a local Ray instance
  (started once, not timed), each worker a fresh actor that loads the pipeline.

For each Ray run the wall time is split into worker-seconds (N workers x wall time):
actor start (process start, imports), pipeline load (inside the actor), generate + label,
writes (JPEG/PNG encoding, fsync), result transfer to the driver, and the rest (idle: waiting
for the driver, or actors that finished early). ``steady img/s`` leaves out the start-up
(time to the first ready actor); ``overall img/s`` is images / wall time. Each configuration
runs ``--repeats`` times; the table shows medians.

    python benchmarks/bench_scaleout.py --n 16 --size 64 --steps 2 --batch 2 --repeats 2

On a CPU-only host the workers share the cores (each gets cores / N threads), so a ratio near
1 is what to expect; on a multi-GPU host each worker gets its own GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from pccfast.core.config import PCCConfig
from pccfast.data.manifest import Manifest
from pccfast.data.writer import SampleWriter
from pccfast.diffusion.settings import GenerationConfig
from pccfast.runs.engine import run_batch, run_local
from pccfast.runs.generate import GenerateStep
from pccfast.data.labelsets import get_label_set
from pccfast.data.prompt_bank import builtin_prompts
from pccfast.data.prompts import read_prompts

__all__ = ["build_parser", "main"]

SHARED_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                              "datadif_prompts_voc.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_scaleout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default=SHARED_PROMPTS if os.path.exists(SHARED_PROMPTS) else None,
                   help="prompt file (default: the shared VOC prompts if present, else the built-in bank)")
    p.add_argument("--n", type=int, default=16, help="prompts per run (default: %(default)s)")
    p.add_argument("--model", default="tiny", help="model (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="prompts per batch (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration, median shown (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    return p


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _baseline(entries, gen, batch, cfg, label_set, tmp, threads):
    """Single process with ``threads`` torch threads: load + warm up (not timed), then the timed run."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    step = GenerateStep(gen, cfg, label_set, SampleWriter(os.path.join(tmp, f"warm{threads}"), label_set))
    load = time.perf_counter() - t0
    run_batch(step, entries[:batch])  # warm-up
    out = os.path.join(tmp, f"single{threads}")
    step.writer = SampleWriter(out, label_set)
    t0 = time.perf_counter()
    report = run_local(lambda device: step, entries, Manifest(out, label_set), batch=batch, progress=False)
    wall = time.perf_counter() - t0
    return dict(config=f"no Ray, {threads} thr", workers=1, images=report.done, wall=wall, load=load, steady=report.done / wall,
                overall=report.done / wall)


def _ray_run(entries, gen, batch, cfg, label_set, tmp, workers, cpus, k):
    from pccfast.runs.ray import run_ray

    out = os.path.join(tmp, f"ray{workers}-{cpus}-{k}")
    make_step = GenerateStep.factory(gen, cfg, label_set, SampleWriter(out, label_set))
    rep = run_ray(make_step, entries, Manifest(out, label_set), batch=batch, device=gen.device, workers=workers,
                  cpus_per_worker=cpus, progress=False)
    if rep.failures:
        raise RuntimeError(f"ray x{workers}: failed items {rep.failures}")
    wall = rep.seconds - rep.connect_seconds
    stats = rep.batch_stats
    run = sum(s.run for s in stats)
    write = sum(s.write for s in stats)
    transfer = sum(s.transfer for s in stats)
    load = sum(rep.load_seconds)
    start = max(0.0, workers * rep.startup_seconds - load)  # process start + imports, all actors
    busy = start + load + run + transfer
    return dict(
        config=f"ray x{workers}, {max(1, int(cpus))} thr", workers=workers, images=rep.done, wall=wall, startup=rep.startup_seconds,
        load=_median(rep.load_seconds), steady=rep.done / max(wall - rep.startup_seconds, 1e-9),
        overall=rep.done / wall, batch_run=_median([s.run for s in stats]),
        transfer_ms=1000 * _median([s.transfer for s in stats]),
        split=dict(start=start, load=load, compute=run - write, write=write, transfer=transfer,
                   other=max(0.0, workers * wall - busy)),
    )


def _table(rows, base):
    out = ["| config | images | wall s | start-up s | load s | batch s | transfer ms | steady img/s | overall img/s |"
           " steady vs first ray |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["steady"] / base["steady"] if base else float("nan")
        out.append(f"| {r['config']} | {r['images']} | {r['wall']:.2f} | {r.get('startup', 0.0):.2f} | "
                   f"{r['load']:.2f} | {r.get('batch_run', float('nan')):.3f} | {r.get('transfer_ms', float('nan')):.1f} | "
                   f"{r['steady']:.2f} | {r['overall']:.2f} | {ratio:.2f}x |")
    return "\n".join(out)


def _split_table(rows):
    keys = ["start", "load", "compute", "write", "transfer", "other"]
    names = ["actor start", "pipeline load", "generate+label", "writes", "transfer", "idle/other"]
    out = ["| config | worker-s | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(keys)]
    for r in rows:
        if "split" not in r:
            continue
        total = sum(r["split"].values())
        cells = [f"{r['split'][k]:.2f} ({100 * r['split'][k] / total:.0f}%)" for k in keys]
        out.append(f"| {r['config']} | {total:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import ray

    label_set = get_label_set("voc")
    cfg = PCCConfig()
    gen = GenerationConfig(model=args.model, steps=args.steps, height=args.size, width=args.size, device=args.device)
    if args.prompts:
        entries = read_prompts(args.prompts, label_set, limit=args.n)
    else:
        entries = builtin_prompts(label_set, args.n)
    counts = [int(x) for x in args.workers.split(",")]
    cores = os.cpu_count() or 1
    # (workers, CPUs each): each count with an even share of the cores, and one worker on one core
    configs = [(w, cores / w) for w in counts] + ([(1, 1.0)] if 1 in counts and cores > 1 else [])
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_baseline(entries, gen, args.batch, cfg, label_set, tmp, t) for t in sorted({cores, 1}, reverse=True)]
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_init = time.perf_counter() - t0
        try:
            for w, cpus in configs:
                runs = [_ray_run(entries, gen, args.batch, cfg, label_set, tmp, w, cpus, k) for k in range(args.repeats)]
                med = {k: _median([r[k] for r in runs]) for k in runs[0] if isinstance(runs[0][k], float)}
                med.update(config=runs[0]["config"], workers=w, images=runs[0]["images"],
                           split={k: _median([r["split"][k] for r in runs]) for k in runs[0]["split"]})
                rows.append(med)
        finally:
            ray.shutdown()
    base = next((r for r in rows if r["config"].startswith("ray x1")), None)
    print(f"# Scale-out: {args.n} prompts, model {args.model}, {args.size}x{args.size}, {args.steps} steps, batch "
          f"{args.batch}, {args.device}, {cores} cores ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, ray {ray.__version__}; median of {args.repeats}\n")
    print(f"Ray start (ray.init, not in the figures): {ray_init:.2f} s\n")
    print(_table(rows, base) + "\n")
    print("Where the worker-seconds go (N workers x wall time):\n")
    print(_split_table(rows) + "\n")
    ray_rows = [r for r in rows if r["config"].startswith("ray")]
    for a in ray_rows:
        for b in ray_rows:
            if a["workers"] == 2 and b["workers"] == 1:
                print(f"{a['config']} / {b['config']}: steady {a['steady'] / b['steady']:.2f}x, overall "
                      f"{a['overall'] / b['overall']:.2f}x")
    print(f"load average (1 min) at the start {load_start:.1f}, at the end {os.getloadavg()[0]:.1f}, on {cores} cores "
          "(other processes on the machine slow every figure, and multi-threaded runs most)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), ray_init=ray_init, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
