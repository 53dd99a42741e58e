"""The run engine's overlap: stages in line against reading ahead and writing behind, same run.

``generate`` on the tiny model (real diffusion, capture, labeller, JPEG/PNG writes) three ways on
the same prompts into fresh folders: ``io_threads=0`` (diffuse, label, write one after the
other: the baseline); the writer thread with the labeller kept in line (what the engine did
before its ``finish`` stage: only the writes overlap); and the default (batch i labelled, copied
to the host and written on the writer thread while batch i+1 diffuses). ``relabel`` on its
captures twice (in line; read ahead + write behind). Outputs are compared (images and masks
byte for byte, captures by their tensors and metadata); the table gives images/s, the ratio to
the in-line run, and where the in-line run's time goes (diffusion, labeller, writes).

    python benchmarks/bench_engine.py --n 16 --size 128 --steps 2 --batch 4 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

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


class _LabelInLine:
    """The generate step without a separate ``finish`` stage: the labeller runs inside
    ``process`` on the main thread (only the writes overlap), as before the overlap."""

    name = "generate"

    def __init__(self, step):
        self.step = step

    def prepare(self, items):
        return self.step.prepare(items)

    def process(self, prepared):
        return self.step.finish(prepared, self.step.process(prepared))

    def write(self, prepared, made):
        return self.step.write(prepared, made)


class _Timed:
    """Wraps a step and adds up the seconds of each stage (for the in-line run)."""

    name = "generate"

    def __init__(self, step):
        self.step, self.seconds = step, {"diffusion": 0.0, "labeller": 0.0, "write": 0.0}

    def _time(self, key, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        self.seconds[key] += time.perf_counter() - t0
        return out

    def prepare(self, items):
        return self.step.prepare(items)

    def process(self, prepared):
        return self._time("diffusion", self.step.process, prepared)

    def finish(self, prepared, diffused):
        return self._time("labeller", self.step.finish, prepared, diffused)

    def write(self, prepared, made):
        return self._time("write", self.step.write, prepared, made)


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
        variants = (("generate, in line", 0, _Timed), ("generate, write behind, label in line", 1, _LabelInLine),
                    ("generate, label + write behind the next diffusion", 1, None))
        split = None
        for name, io, wrap in variants:
            times = []
            for k in range(args.repeats + 1):  # the first run warms up
                out = os.path.join(tmp, f"gen{len(rows)}-{k}")
                writer = SampleWriter(out, ls, save_captures=True)
                step = GenerateStep(settings, cfg, ls, writer, pipe=pipe)
                step = wrap(step) if wrap is not None else step
                rep, t = timed(lambda: run_local(lambda d: step, entries, Manifest(out, ls), batch=args.batch,
                                                 io_threads=io, progress=False))
                assert rep.done == args.n and not rep.failures
                times.append(t)
                if wrap is _Timed and k > 0:
                    split = {key: split.get(key, 0.0) + v for key, v in step.seconds.items()} if split else dict(step.seconds)
            outs[name] = _files(out)
            rows.append((name, args.n / statistics.median(times[1:])))
        cap_dir, img_dir = os.path.join(tmp, "gen0-0", CAPTURES), os.path.join(tmp, "gen0-0", IMAGES)
        n_gen = len(rows)
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
    gen_names = [r[0] for r in rows[:n_gen]]
    same_gen = all(outs[gen_names[0]] == outs[n] for n in gen_names[1:])
    same_rel = outs["relabel, in line"] == outs["relabel, read ahead + write behind"]
    print(f"commit {git_version()}; {args.n} prompts, tiny model {args.size}x{args.size}, {args.steps} steps, "
          f"batch {args.batch}, {args.threads} torch thread(s), median of {args.repeats}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| run | images/s | vs in line |\n|---|---:|---:|")
    for i, (name, rate) in enumerate(rows):
        base = rows[0][1] if i < n_gen else rows[n_gen][1]
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")
    total = sum(split.values())
    print("\nwhere the in-line generate run's time goes: " +
          ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in split.items()))
    print(f"outputs identical between the variants: generate {same_gen}, relabel {same_rel}")
    return 0 if same_gen and same_rel else 1


if __name__ == "__main__":
    sys.exit(main())
