"""Fidelity: do pccfast and the reference agree as closely as the reference agrees with itself?

k-means is the one random step of the labeller, so two runs of the reference with different
k-means seeds already disagree on some scenes (they land in other local optima). The claim to
check is that pccfast's masks are as close to the reference's as the reference's own runs are
to each other, and no further from the planted ground truth. On synthetic SD-sized scenes
(``pccfast.synthetic.make_scene``), with k-means seeds 0 and 1 on both paths:

- ref-vs-ref: mask mIoU between the reference's seed-0 and seed-1 masks (the floor);
- pcc-vs-pcc: the same for pccfast;
- pcc-vs-ref: the mean over the four seed pairs (pccfast seed a, reference seed b);
- each run against the planted ground truth.

Means over the scenes with 95% bootstrap intervals (resampling scenes), and the paired
difference pcc-vs-ref minus ref-vs-ref with its interval.

    python benchmarks/fidelity.py --scenes 24 --threads 2 --json fidelity.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pccfast.testing.reference as ref  # noqa: E402
from bench_labeller import _jpeg_roundtrip  # noqa: E402

from pccfast.core.config import PCCConfig  # noqa: E402
from pccfast.core.labeller import label_images  # noqa: E402
from pccfast.data.labelsets import get_label_set  # noqa: E402
from pccfast.testing.synthetic import make_scene, mask_miou, scene_features  # noqa: E402

__all__ = ["main"]


def _interval(values: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval of the mean over scenes."""
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/fidelity.py",
                                description="Agreement of pccfast's masks with the reference's, against the agreement "
                                "of two reference runs with different k-means seeds, on synthetic scenes with a "
                                "planted ground truth.")
    p.add_argument("--scenes", type=int, default=24, help="number of scenes (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=2000, help="seed of the first scene (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for both paths (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write per-scene figures as JSON to FILE")
    args = p.parse_args(argv)
    if args.scenes < 2:
        raise SystemExit(f"--scenes has to be at least 2 but is {args.scenes}")
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    ls = get_label_set("voc")
    cfg = PCCConfig()
    seeds = (0, 1)
    rows = []
    with threadpool_limits(limits=args.threads):
        for i in range(args.scenes):
            s = make_scene(args.first_seed + i, grid=64, image_size=512, heads=(20, 10, 5), layers_per_scale=3,
                           head_dim=64, num_classes=ls.num_classes)
            image = _jpeg_roundtrip(s.image)  # (H, W, 3) uint8, what the reference reads
            ca = s.class_attention.numpy()
            f_ref = ref.pca_stage([x.numpy() for x in s.layers], 64, 0)
            refm = {sd: ref.refine_stage(ref.blocky_stage(f_ref, ca, sd), image, sd) for sd in seeds}
            feats = scene_features([x[None] for x in s.layers], 64, cfg)  # (1, D, 64, 64)
            img_t = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]
            pccm = {sd: label_images(feats, s.class_attention[None], img_t, cfg.replace(kmeans_seed=sd)).mask[0].numpy()
                    for sd in seeds}
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
            row = {
                "seed": s.seed, "classes": s.classes,
                "ref_vs_ref": mask_miou(t(refm[0]), t(refm[1])),
                "pcc_vs_pcc": mask_miou(t(pccm[0]), t(pccm[1])),
                "pcc_vs_ref": float(np.mean([mask_miou(t(pccm[a]), t(refm[b])) for a in seeds for b in seeds])),
                "gt_ref": float(np.mean([mask_miou(t(refm[sd]), s.gt, skip=255) for sd in seeds])),
                "gt_pcc": float(np.mean([mask_miou(t(pccm[sd]), s.gt, skip=255) for sd in seeds])),
            }
            rows.append(row)
            print(f"scene {i + 1}/{args.scenes} (seed {s.seed}): ref-ref {row['ref_vs_ref']:.3f} pcc-pcc "
                  f"{row['pcc_vs_pcc']:.3f} pcc-ref {row['pcc_vs_ref']:.3f} gt ref {row['gt_ref']:.3f} "
                  f"pcc {row['gt_pcc']:.3f}", file=sys.stderr, flush=True)
    rng = np.random.default_rng(0)
    col = {k: np.array([r[k] for r in rows]) for k in ("ref_vs_ref", "pcc_vs_pcc", "pcc_vs_ref", "gt_ref", "gt_pcc")}
    stats = {k: _interval(v, rng) for k, v in col.items()}
    stats["pcc_vs_ref_minus_ref_vs_ref"] = _interval(col["pcc_vs_ref"] - col["ref_vs_ref"], rng)
    stats["gt_pcc_minus_gt_ref"] = _interval(col["gt_pcc"] - col["gt_ref"], rng)
    names = {
        "ref_vs_ref": "mask mIoU, reference seed 0 vs seed 1 (the floor)",
        "pcc_vs_pcc": "mask mIoU, pccfast seed 0 vs seed 1",
        "pcc_vs_ref": "mask mIoU, pccfast vs reference (4 seed pairs)",
        "pcc_vs_ref_minus_ref_vs_ref": "pccfast-vs-reference minus the floor (paired)",
        "gt_ref": "mask mIoU vs planted ground truth, reference",
        "gt_pcc": "mask mIoU vs planted ground truth, pccfast",
        "gt_pcc_minus_gt_ref": "ground truth: pccfast minus reference (paired)",
    }
    lines = [f"{args.scenes} synthetic SD-sized scenes (first seed {args.first_seed}), k-means seeds 0 and 1 on both "
             f"paths, {args.threads} threads; mean over scenes [95% bootstrap interval].", "",
             "| measure | mean [95% interval] |", "|---|---|"]
    for key, name in names.items():
        m, lo, hi = stats[key]
        lines.append(f"| {name} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] |" if "minus" in key else
                     f"| {name} | {m:.3f} [{lo:.3f}, {hi:.3f}] |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": vars(args), "per_scene": rows, "stats": stats, "table_markdown": table}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
