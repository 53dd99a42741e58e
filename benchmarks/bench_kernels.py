"""Benchmark: each CPU kernel (``kernels/*.c``) against the torch path it replaces.

Same inputs for both, one run, synthetic SD-sized scenes (``pccfast.synthetic.make_scene``):

- refinement k-means: (R, G, B, x', y') points of 512x512 images, k = 20;
- section 2 k-means: clustering points of the (630, 64, 64) features, k = 4, 7, 10, with
  their preparation (``features.clustering_points``);
- connected components: the refinement's 512x512 k-means label maps;
- clean-up: refined 512x512 label maps before the clean-up.

Reports the median seconds per image of each path, the ratio, and whether the outputs agree
(k-means: adjusted Rand index against the torch path; components and clean-up: equal).

    python benchmarks/bench_kernels.py --scenes 8 --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pccfast.backends import native
from pccfast.core.components import connected_components
from pccfast.core.config import PCCConfig
from pccfast.core.features import clustering_points
from pccfast.core.kmeans import kmeans
from pccfast.core.labeller import label_images
from pccfast.core.refine import cleanup, piece_majority, pool_small_pieces, refine_points
from pccfast.core.seeding import SeedingCache
from pccfast.testing.synthetic import make_scene, scene_features
from pccfast.testing.timing import median_time

__all__ = ["main"]


def _ari(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest adjusted Rand index over the batch items. (B, N) labels each."""
    from sklearn.metrics import adjusted_rand_score

    return min(adjusted_rand_score(x.numpy(), y.numpy()) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_kernels.py",
                                description="Time every C kernel against the torch path it replaces on the same "
                                "synthetic SD-sized inputs and check that their outputs agree.")
    p.add_argument("--scenes", type=int, default=8, help="images per batch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    for name in ("scenes", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} has to be at least 1 but is {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    for kernel in native.kernel_names():
        native.load(kernel)  # fail early and loudly: this benchmark is about the kernels
    n, cfg = args.scenes, PCCConfig()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"making {n} scenes")
    scenes = [make_scene(1000 + i, grid=64, image_size=512, heads=(20, 10, 5), layers_per_scale=3, head_dim=64,
                         num_classes=21) for i in range(n)]
    layers = [torch.stack([s.layers[j] for s in scenes]) for j in range(len(scenes[0].layers))]
    feats = scene_features(layers, 64, cfg)  # (B, 630, 64, 64)
    ca = torch.stack([s.class_attention for s in scenes])
    images = torch.stack([s.image for s in scenes])  # (B, 3, 512, 512) uint8
    blocky_full = label_images(feats, ca, images, cfg.replace(refine=False)).blocky_full  # (B, 512, 512)
    points = refine_points(images)  # (B, 262144, 5)

    rows = []

    def compare(name, torch_fn, native_fn, agree):
        log(f"{name}: torch")
        a, ta = median_time(torch_fn, args.repeats)  # warm-up first (fills the path's SeedingCache)
        log(f"{name}: native")
        b, tb = median_time(native_fn, args.repeats)
        rows.append({"stage": name, "torch_s_per_image": ta / n, "native_s_per_image": tb / n,
                     "ratio": ta / tb, "agreement": agree(a, b)})
        return a

    # one k-means++ cache per path, as a run keeps one for all its batches
    caches = {"torch": SeedingCache(), "native": SeedingCache()}

    def section2(backend):
        prepared = clustering_points(feats, transpose=backend == "torch")
        return torch.cat([kmeans(prepared.x, k, backend=backend, prepared=prepared, cache=caches[backend])[0]
                          for k in cfg.cluster_ks])

    compare("section 2 k-means (k = 4, 7, 10) + points", lambda: section2("torch"), lambda: section2("native"),
            lambda a, b: f"min ARI {_ari(a, b):.4f}")
    clusters = compare("refinement k-means (k = 20)",
                       lambda: kmeans(points, 20, backend="torch", cache=caches["torch"])[0],
                       lambda: kmeans(points, 20, backend="native", cache=caches["native"])[0],
                       lambda a, b: f"min ARI {_ari(a, b):.4f}")
    maps = clusters.view(n, 512, 512)
    pieces = compare("connected components 512x512", lambda: connected_components(maps, 8, backend="torch"),
                     lambda: connected_components(maps, 8, backend="native"),
                     lambda a, b: "equal" if torch.equal(a, b) else "DIFFERENT")
    relabelled = piece_majority(pool_small_pieces(pieces.view(n, -1), cfg.min_piece_pixels),
                                blocky_full.reshape(n, -1).long(), cfg.dominance_ratio, cfg.ignore_index).view(n, 512, 512)
    compare("clean-up 512x512", lambda: cleanup(relabelled, cfg.replace(cleanup_backend="torch")),
            lambda: cleanup(relabelled, cfg.replace(cleanup_backend="native")),
            lambda a, b: "equal" if torch.equal(a, b) else "DIFFERENT")

    lines = [f"{n} images per batch, {args.threads} threads, median of {args.repeats}; load average (1 min) "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.", "",
             "| stage | torch s/img | kernel s/img | torch / kernel | outputs |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['torch_s_per_image']:.4f} | {r['native_s_per_image']:.4f} | "
                     f"{r['ratio']:.1f}x | {r['agreement']} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "rows": rows, "table_markdown": table}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
