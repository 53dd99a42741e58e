"""The GPU acceptance run: one command, one table, one JSON (issue "GPU-first execution").

    python benchmarks/gpu_check.py --json gpu_check.json        # on a CUDA machine, offline, no weights
    python benchmarks/gpu_check.py --dry-run                    # CI-sized, on the CPU: keeps the script alive

What it measures (each section times itself; a section that fails reports its error and the
run goes on; sections are skipped once ``--budget-s`` is spent):

1. the CUDA test subset (``pytest -k cuda`` over tests/core and tests/diffusion): pass/fail;
2. labeller ms per image at batch 8, on the device and on the CPU path, same scenes;
3. host synchronisations per labelled batch (CUDA: ``torch.cuda.set_sync_debug_mode``
   warnings; CPU: ops that read device data on the host, counted by a dispatch mode);
4. the UNet step with and without the capture at batch 1, 8 and 16 (float16 on CUDA), from
   the difference of two step counts so that text encoding and decoding cancel; the capture
   ratio; and the fraction of the device's peak the guided step reaches (about 804 GFLOP per
   UNet sample at 64x64 latents, two samples per guided step);
5. ``generate`` end to end (diffusion, capture, labeller, files) at 512x512 with 80 and with 25
   steps: images per second;
6. peak GPU memory.

The model is SD 2.1-base at full size with random weights, built from configs in the package
(``pccfast.diffusion.sd21_random``): its speed and memory are the real model's, its images are
noise. ``--dry-run`` uses the tiny model at 64x64 with 2 steps and small batches instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from pccfast.core.config import PCCConfig
from pccfast.core.labeller import label_images
from pccfast.data.labelsets import get_label_set
from pccfast.data.prompt_bank import builtin_prompts
from pccfast.diffusion.generation import generate_with_capture
from pccfast.diffusion.settings import GenerationConfig
from pccfast.runs.generate import run_generation
from pccfast.testing.synthetic import make_scene, scene_features, stack_scenes
from pccfast.testing.timing import git_version, sync, timed

__all__ = ["main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_GFLOP_PER_SAMPLE = 804.0  # SD 2.1-base UNet, one sample at 64x64 latents (a guided step is two)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on any device: checks that the script runs")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the sections left after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense float16 peak, for the fraction of the limit (default: H200/H100 SXM)")
    return p


class Run:
    def __init__(self, args):
        self.args, self.t0, self.rows, self.data = args, time.perf_counter(), [], {}
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.cuda and not args.dry_run else torch.float32

    def section(self, name, fn):
        if time.perf_counter() - self.t0 > self.args.budget_s:
            self.rows.append((name, "skipped (time budget spent)"))
            return
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # a failing section is reported, the others still run
            out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        out = dict(out, seconds=round(time.perf_counter() - t, 2))
        self.data[name] = out
        self.rows.append((name, ", ".join(f"{k} {v}" for k, v in out.items())))

    # --- 1. the CUDA tests -------------------------------------------------------------
    def tests(self):
        if not self.cuda:
            return {"status": "skipped (no CUDA device)"}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/core", "tests/diffusion"],
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
        tail = (res.stdout.strip().splitlines() or ["no output"])[-1]
        return {"status": "pass" if res.returncode == 0 else "FAIL", "summary": tail}

    # --- 2./3. the labeller ------------------------------------------------------------
    def _scenes(self):
        if self.args.dry_run:
            scenes = [make_scene(s, grid=16, image_size=64, heads=(2, 1, 1)) for s in range(2)]
        else:
            scenes = [make_scene(s) for s in range(8)]
        b = stack_scenes(scenes)
        return scene_features(b["layers"], scenes[0].grid), b["class_attention"], b["images"]

    def labeller(self):
        feats, ca, images = self._scenes()
        n = feats.shape[0]
        out = {}
        for name, device, cfg in (("device", self.device, PCCConfig().replace(kmeans_backend="torch",
                                   components_backend="torch", cleanup_backend="torch")),
                                  ("cpu", torch.device("cpu"), PCCConfig())):
            args = (feats.to(device), ca.to(device), images.to(device))
            label_images(*args, cfg)  # warm-up (kernel builds, caches)
            times = [timed(lambda: label_images(*args, cfg), device)[1] for _ in range(3)]
            out[f"{name} ms/img"] = round(1000 * sorted(times)[1] / n, 1)
        out["cpu / device"] = round(out["cpu ms/img"] / out["device ms/img"], 2)
        return out

    def syncs(self):
        feats, ca, images = self._scenes()
        cfg = PCCConfig().replace(kmeans_backend="torch", components_backend="torch", cleanup_backend="torch")
        args = (feats.to(self.device), ca.to(self.device), images.to(self.device))
        if self.cuda:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    label_images(*args, cfg)
                    sync(self.device)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            return {"host syncs per labelled batch": sum("synchroniz" in str(w.message) for w in caught),
                    "batch": feats.shape[0]}
        from pccfast.testing.counting import OpCounter

        with OpCounter() as counter:
            label_images(*args, cfg)
        return {"host syncs per labelled batch (counted)": counter.total_syncs, "ops": counter.total_ops,
                "batch": feats.shape[0]}

    # --- 4./5./6. diffusion --------------------------------------------------------------
    def _pipe(self):
        if not hasattr(self, "pipe"):
            if self.args.dry_run:
                from pccfast.diffusion.tiny import build_tiny_pipeline

                self.pipe = build_tiny_pipeline(device=self.device, dtype=self.dtype)
                self.pipe.set_progress_bar_config(disable=True)
            else:
                from pccfast.diffusion.sd21_random import build_sd21_random_pipeline

                self.pipe = build_sd21_random_pipeline(device=self.device, dtype=self.dtype)
        return self.pipe

    def unet_steps(self):
        pipe, voc = self._pipe(), get_label_set("voc")
        side = 64 if self.args.dry_run else 512
        steps = (1, 2) if self.args.dry_run else (2, 6)
        out = {}
        for b in ((1, 2) if self.args.dry_run else (1, 8, 16)):
            prompts, classes, seeds = ["a cat on a sofa"] * b, [["cat", "sofa"]] * b, list(range(b))

            def plain(s):
                return pipe(prompts, num_inference_steps=s, guidance_scale=7.5, height=side, width=side,
                            output_type="latent", generator=[torch.Generator().manual_seed(x) for x in seeds])

            def captured(s):
                return generate_with_capture(pipe, prompts, classes, voc, seeds, steps=s, height=side, width=side)

            per_step = {}
            for name, fn in (("plain", plain), ("capture", captured)):
                fn(steps[0])  # warm-up
                t = [timed(lambda s=s: fn(s), self.device)[1] for s in steps]
                per_step[name] = (t[1] - t[0]) / (steps[1] - steps[0])
            out[f"b{b} ms/step plain"] = round(1000 * per_step["plain"], 1)
            out[f"b{b} ms/step capture"] = round(1000 * per_step["capture"], 1)
            out[f"b{b} capture ratio"] = round(per_step["capture"] / per_step["plain"], 3)
            if not self.args.dry_run:
                tflops = 2 * b * UNET_GFLOP_PER_SAMPLE / 1000 / per_step["plain"]
                out[f"b{b} peak fraction"] = round(tflops / self.args.peak_tflops, 3)
        if self.cuda:
            out["peak GiB"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return out

    def generate(self):
        pipe, voc = self._pipe(), get_label_set("voc")
        side = 64 if self.args.dry_run else 512
        out = {}
        for steps, n in (((2, 4),) if self.args.dry_run else ((80, 16), (25, 32))):
            settings = GenerationConfig(model="sd21-random" if not self.args.dry_run else "tiny", steps=steps,
                                        height=side, width=side, device=str(self.device),
                                        dtype=str(self.dtype).replace("torch.", ""))
            with tempfile.TemporaryDirectory() as tmp:
                report, t = timed(lambda: run_generation(builtin_prompts(voc, n), settings, PCCConfig(), voc, tmp,
                                                         batch=min(8, n), progress=False, pipe=pipe), self.device)
            out[f"{steps} steps img/s"] = round(report.done / t, 3)
            out[f"{steps} steps failed"] = len(report.failures)
        if self.cuda:
            out["peak GiB"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = Run(args)
    for name, fn in (("CUDA tests", run.tests), ("labeller", run.labeller), ("host syncs", run.syncs),
                     ("UNet step", run.unet_steps), ("generate", run.generate)):
        run.section(name, fn)
    gpu = torch.cuda.get_device_name(run.device) if run.cuda else "none"
    print(f"gpu_check at {git_version()}: device {run.device} ({gpu}), torch {torch.__version__}, "
          f"{'dry run (tiny sizes)' if args.dry_run else 'SD 2.1-base sizes, random weights'}, "
          f"{time.perf_counter() - run.t0:.0f} s\n")
    print("| section | result |\n|---|---|")
    for name, text in run.rows:
        print(f"| {name} | {text} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(device=str(run.device), gpu=gpu, dry_run=args.dry_run, commit=git_version(),
                           sections=run.data), f, indent=1)
    return 0 if not any("error" in v for v in run.data.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
