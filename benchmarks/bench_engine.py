"""The run engine's overlap: stages in line against reading ahead and writing behind, same run.

``generate`` on the tiny model (real diffusion, capture, labeller, JPEG/PNG writes) and
``relabel`` on its captures, each twice on the same inputs into fresh folders: ``io_threads=0``
(prepare, process, write one after the other: the baseline) and the default (the next batch
read on one thread, the last one written on another, while this one is processed). Outputs
are compared (images and masks byte for byte, captures by their tensors and metadata); the table gives images/s and the ratio to the in-line run.

    python benchmarks/bench_engine.py --n 24 --size 128 --steps 2 --batch 4 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

from pccfast.core.config import PCCConfig
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import CAPTURES, IMAGES
from pccfast.data.manifest import Manifest
from pccfast.data.prompt_bank import builtin_prompts
from pccfast.data.writer import SampleWriter
from pccfast.diffusion.settings import GenerationConfig
from pccfast.diffusion.tiny import build_tiny_pipeline
from pccfast.runs.engine import run_local
from pccfast.runs.generate import GenerateStep
from pccfast.runs.relabel import relabel_dir
from pccfast.testing.timing import git_version, timed

__all__ = ["main"]


def _files(root: str) -> dict:
    """Every output file's content: bytes, or for a capture file its tensors and metadata
    (safetensors writes its metadata map in no fixed order, so equal captures differ in bytes)."""
    from safetensors import safe_open

    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            path = os.path.join(d, f)
            if f == "manifest.jsonl":  # holds timings
                continue
            if f.endswith(".safetensors"):
                with safe_open(path, "np") as st:
                    out[os.path.relpath(path, root)] = (st.metadata(), {k: st.get_tensor(k).tobytes() for k in st.keys()})
            else:
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, root)] = fh.read()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_engine.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="prompts (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="image side (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="prompts per batch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant, median (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ls, cfg = get_label_set("voc"), PCCConfig()
    settings = GenerationConfig(model="tiny", steps=args.steps, height=args.size, width=args.size)
    entries = builtin_prompts(ls, args.n)
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    rows, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, io in (("generate, in line", 0), ("generate, write behind", 1)):
            times = []
            for k in range(args.repeats + 1):  # the first run warms up
                out = os.path.join(tmp, f"gen{io}-{k}")
                writer = SampleWriter(out, ls, save_captures=True)
                step = GenerateStep(settings, cfg, ls, writer, pipe=pipe)
                rep, t = timed(lambda: run_local(lambda d: step, entries, Manifest(out, ls), batch=args.batch,
                                                 io_threads=io, progress=False))
                assert rep.done == args.n and not rep.failures
                times.append(t)
            outs[name] = _files(out)
            rows.append((name, args.n / statistics.median(times[1:])))
        cap_dir, img_dir = os.path.join(tmp, "gen0-0", CAPTURES), os.path.join(tmp, "gen0-0", IMAGES)
        for name, io in (("relabel, in line", 0), ("relabel, read ahead + write behind", 2)):
            times = []
            for k in range(args.repeats + 1):
                out = os.path.join(tmp, f"rel{io}-{k}")
                rep, t = timed(lambda: relabel_dir(cap_dir, img_dir, out, cfg, batch=args.batch, device="cpu",
                                                   workers=io))
                assert rep.done == args.n and not rep.failures
                times.append(t)
            outs[name] = _files(out)
            rows.append((name, args.n / statistics.median(times[1:])))
    same_gen = outs["generate, in line"] == outs["generate, write behind"]
    same_rel = outs["relabel, in line"] == outs["relabel, read ahead + write behind"]
    print(f"commit {git_version()}; {args.n} prompts, tiny model {args.size}x{args.size}, {args.steps} steps, "
          f"batch {args.batch}, {args.threads} torch thread(s), median of {args.repeats}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| run | images/s | vs in line |\n|---|---:|---:|")
    for i, (name, rate) in enumerate(rows):
        base = rows[i - i % 2][1]
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")
    print(f"\noutputs identical between the two variants: generate {same_gen}, relabel {same_rel}")
    return 0 if same_gen and same_rel else 1


if __name__ == "__main__":
    sys.exit(main())
