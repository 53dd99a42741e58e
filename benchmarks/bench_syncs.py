"""Benchmark: ATen ops and host synchronisations per stage of labelling one batch (torch path).

On a GPU every op that reads device data on the host (``.item()``, ``bool(t)``, a boolean-mask
index, ``nonzero``, ``bincount``, ``unique``, ...) stalls the queue until the device has caught
up. This counts them on the CPU, where the same ops run, with a ``TorchDispatchMode`` that sees
every ATen op, for a labelled batch of SD-sized synthetic scenes
(``pccfast.testing.synthetic.make_scene(seed, grid=64, image_size=512)``) on the torch path
(``PCCFAST_NATIVE=0``, every backend "torch"), per stage:

1. PCA: ``grouped_headwise_features`` (head-wise PCA of all attention layers, as the capture runs it);
2. section-2 k-means: ``kmeans`` (and its shared ``clustering_points``) inside ``blocky_mask``;
3. components: every ``connected_components`` (blocky pieces and refinement pieces);
4. blocky vote: the rest of ``blocky_mask`` (class maps, IoU labels, the vote);
5. refinement k-means: ``kmeans`` inside ``refine_mask``;
6. refinement rest: the rest of ``refine_mask`` and the upsampling of the blocky mask.

Counted as syncs: ``aten._local_scalar_dense`` (item, bool, int), ``aten.nonzero``,
``aten.bincount``, every ``unique``, ``aten.masked_select``, ``aten.index``/``aten.index_put``
with a boolean index, ``aten.repeat_interleave`` with tensor repeats, ``aten.equal``,
``aten.is_nonzero``, and on a GPU run (``--device cuda``) copies from the device to the host.
On a CPU run such copies (``.cpu()``, ``.tolist()``) are invisible, and the CPU code paths run
(the k-means E-step in chunks, so more ops than on a GPU). Issue targets for the whole batch
of 8: at most 50 syncs and 5,000 ops (reported, not asserted).

    PCCFAST_NATIVE=0 python benchmarks/bench_syncs.py                # this checkout
    PCCFAST_NATIVE=0 python benchmarks/bench_syncs.py --compare HEAD~1  # before/after
    PCCFAST_NATIVE=0 python benchmarks/bench_syncs.py --paths device    # the GPU code paths, on the CPU

``--compare REV`` runs the same counting in a subprocess on a temporary ``git worktree`` of
REV (removed afterwards) and prints both with the ratio after / before.
"""
from __future__ import annotations

import argparse
import functools
import json
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

STAGES = ("pca", "section-2 k-means", "components", "blocky vote", "refinement k-means", "refinement rest")
TARGET_SYNCS, TARGET_OPS = 50, 5000

def _counting():
    """The op counter, ``pccfast/testing/counting.py`` of THIS checkout, loaded by path: the same
    counter then also measures an older revision (``--compare``), whose tree may not have it."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pccfast", "testing",
                        "counting.py")
    spec = importlib.util.spec_from_file_location("_pccfast_counting", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OpCounter = _counting().OpCounter


def _wrap(counter: OpCounter, module, attr: str, name: str, patched: list) -> None:
    """Replace module.attr by a wrapper that runs it under stage ``name`` (if it exists)."""
    fn = getattr(module, attr, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def staged(*a, **kw):
        with counter.stage(name):
            return fn(*a, **kw)

    setattr(module, attr, staged)
    patched.append((module, attr, fn))


def _features(layers: list, grid: int, cfg) -> torch.Tensor:
    """The head-wise PCA features as the capture computes them at the last step (one batched
    call for every layer: ``grouped_headwise_features``), or, in trees without it, per layer."""
    from pccfast.core import pca

    grouped = getattr(pca, "grouped_headwise_features", None)
    if grouped is None:
        from pccfast.testing.synthetic import scene_features

        return scene_features(layers, grid, cfg)
    return torch.cat(grouped(layers, grid, cfg), dim=1)  # (B, D, h, w)


def count(scenes: int, image_size: int, grid: int, check_every: int | None, device: str = "cpu",
          paths: str = "native") -> dict:
    """Label ``scenes`` synthetic scenes in one batch on ``device`` under the counter -> counts per stage.

    paths: "native" runs the code paths of ``device``; "device" runs the accelerator code paths
    even on the CPU (``pccfast.core.checks.device_code_paths``: what a GPU would count)."""
    os.environ["PCCFAST_NATIVE"] = "0"
    import pccfast
    from pccfast.core import blocky, labeller, refine
    from pccfast.core.config import PCCConfig
    from pccfast.testing.synthetic import make_scene

    sc = [make_scene(seed, grid=grid, image_size=image_size) for seed in range(scenes)]
    layers = [torch.stack([s.layers[i] for s in sc]).to(device)
              for i in range(len(sc[0].layers))]  # each (B, heads, S*S, d)
    cls = torch.stack([s.class_attention for s in sc]).to(device)  # (B, K, h, w)
    images = torch.stack([s.image for s in sc]).to(device)  # (B, 3, H, W)
    cfg = PCCConfig().replace(kmeans_backend="torch", components_backend="torch", cleanup_backend="torch")
    if check_every is not None and "kmeans_check_every" in PCCConfig.field_names():
        cfg = cfg.replace(kmeans_check_every=check_every)
    counter, patched = OpCounter(), []
    for module, attr, name in ((blocky, "kmeans", STAGES[1]), (blocky, "kmeans_many", STAGES[1]),
                               (blocky, "clustering_points", STAGES[1]),
                               (blocky, "connected_components", STAGES[2]), (refine, "kmeans", STAGES[4]),
                               (refine, "connected_components", STAGES[2]), (labeller, "blocky_mask", STAGES[3]),
                               (labeller, "refine_mask", STAGES[5]), (labeller, "resize", STAGES[5])):
        _wrap(counter, module, attr, name, patched)
    import contextlib

    from pccfast.core import checks

    emulate = getattr(checks, "device_code_paths", None)
    if paths == "device" and emulate is None:
        raise SystemExit("this tree has no device_code_paths: count it with --paths native")
    start = time.perf_counter()
    try:
        with counter, (emulate() if paths == "device" else contextlib.nullcontext()):
            with counter.stage(STAGES[0]):
                feats = _features(layers, grid, cfg)  # (B, D, h, w)
            result = pccfast.label_images(feats, cls, images, cfg)
        if device != "cpu":
            torch.cuda.synchronize()
    finally:
        for module, attr, fn in reversed(patched):
            setattr(module, attr, fn)
    seconds = time.perf_counter() - start
    return {"pccfast": os.path.dirname(pccfast.__file__), "scenes": scenes, "image_size": image_size,
            "device": device, "paths": paths,
            "seconds": seconds, "ops": dict(counter.ops), "launches": dict(counter.launches), "syncs": dict(counter.syncs),
            "sync_ops": {f"{s}: {o}": n for (s, o), n in sorted(counter.sync_ops.items())},
            "mask_sum": int(result.mask.long().sum())}


def _rows(res: dict) -> list[str]:
    return [s for s in STAGES + ("other",) if s in res["ops"] or s in res["syncs"]]


def print_table(res: dict, before: dict | None = None) -> None:
    """Per stage: ops (every aten call), launches (the ops that can start a kernel: not views
    or bare allocations; absent from trees older than that count) and syncs."""
    seen = set(_rows(res)) | (set(_rows(before)) if before is not None else set())
    stages = [s for s in STAGES + ("other",) if s in seen]
    tot = lambda r, key: sum(r.get(key, {}).values())  # noqa: E731
    cols = ("ops", "launches", "syncs")
    if before is None:
        print(f"{'stage':<22}{'ops':>10}{'launches':>10}{'syncs':>8}")
        for s in stages:
            print(f"{s:<22}{res['ops'].get(s, 0):>10}{res['launches'].get(s, 0):>10}{res['syncs'].get(s, 0):>8}")
        print(f"{'total':<22}{tot(res, 'ops'):>10}{tot(res, 'launches'):>10}{tot(res, 'syncs'):>8}")
    else:
        ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
        print(f"{'stage':<22}" + "".join(f"{c + ' before':>16}{'after':>8}{'ratio':>7}" for c in cols))
        for s in stages + ["total"]:
            line = f"{s:<22}"
            for c in cols:
                b = tot(before, c) if s == "total" else before.get(c, {}).get(s, 0)
                a = tot(res, c) if s == "total" else res[c].get(s, 0)
                line += f"{b:>16}{a:>8}{ratio(a, b):>7}"
            print(line)
        if before["mask_sum"] != res["mask_sum"]:
            print(f"note: the masks differ (sum {before['mask_sum']} before, {res['mask_sum']} after)")
    print(f"targets for the batch: <= {TARGET_SYNCS} syncs, <= {TARGET_OPS} ops: "
          f"syncs {'met' if tot(res, 'syncs') <= TARGET_SYNCS else 'not met'}, "
          f"ops {'met' if tot(res, 'ops') <= TARGET_OPS else 'not met'} counting every aten call, "
          f"{'met' if tot(res, 'launches') <= TARGET_OPS else 'not met'} counting kernel launches "
          f"({res['seconds']:.1f} s counted run)")


def _compare(rev: str, args) -> dict:
    """The same counting on a temporary worktree of ``rev``, in a subprocess."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="bench-syncs-")
    tree = os.path.join(tmp, "tree")
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", tree, rev], check=True, cwd=root)
    try:
        out = os.path.join(tmp, "before.json")
        env = dict(os.environ, PYTHONPATH=tree, PCCFAST_NATIVE="0")
        cmd = [sys.executable, os.path.abspath(__file__), "--scenes", str(args.scenes), "--image-size",
               str(args.image_size), "--grid", str(args.grid), "--device", args.device, "--paths", args.paths, "--json", out, "--quiet"]
        subprocess.run(cmd, check=True, cwd=tree, env=env)
        with open(out) as f:
            return json.load(f)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], check=False, cwd=root)
        subprocess.run(["git", "worktree", "prune"], check=False, cwd=root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=8, help="batch size (synthetic scenes 0..n-1)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--grid", type=int, default=64)
    p.add_argument("--check-every", type=int, default=None, help="cfg.kmeans_check_every (default: the config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the tensors live (a GPU run counts the GPU code paths)")
    p.add_argument("--paths", choices=("native", "device"), default="native",
                   help="native: the code paths of --device; device: the accelerator code paths run on the CPU "
                        "(what a GPU would count: no chunked E-step, no CPU argmin trick, no compaction)")
    p.add_argument("--compare", metavar="REV", help="also count on a worktree of REV and print before/after")
    p.add_argument("--json", help="write the counts here")
    p.add_argument("--quiet", action="store_true", help="no table (for --compare's subprocess)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = count(args.scenes, args.image_size, args.grid, args.check_every, args.device, args.paths)
    before = _compare(args.compare, args) if args.compare else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res if before is None else {"after": res, "before": before}, f, indent=1)
    if not args.quiet:
        print(f"labelled batch of {args.scenes} synthetic scenes ({args.image_size}px, grid {args.grid}), "
              f"torch path on {args.device}, {args.paths} code paths")
        print_table(res, before)
        for key, n in res["sync_ops"].items():
            print(f"  sync {key} x{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
